"""The `hopflow` command line (typer): one module per noun, rendering in `render`."""
