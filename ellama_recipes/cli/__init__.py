"""The `ellama` command line (Typer). One module per command group; no business logic here."""
