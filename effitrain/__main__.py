"""``python -m effitrain`` runs the command line."""

from effitrain.cli import main

main()
