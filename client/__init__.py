"""`finetune`: the service's command-line client (typer + rich), installed with the project."""
