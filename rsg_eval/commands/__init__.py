"""CLI command modules. Each defines `register(app)` and imports nothing heavy at module level."""
