"""cara-serve --replicas N: engine replicas on Ray Serve (docs/ray_serve.md)."""
