"""The polars face: the expressions, the ``.gemini`` namespaces, conversations as columns, image display."""
