"""One cara-serve instance: the aiohttp app over one Engine (routes, generation, adapters,
metrics, OpenAPI). The fleet (server/fleet) and the router (server/router) run several."""
