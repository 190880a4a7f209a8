"""HTTP: the FastAPI app, its routes and schemas. Talks to models only through `TextGenerator` and the engine."""
