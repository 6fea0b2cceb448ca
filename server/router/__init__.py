"""cara-router: one OpenAI endpoint over several cara-serve instances (docs/router.md)."""
