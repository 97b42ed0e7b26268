"""The `dp` command line: `dp.cli.main` and one module per subcommand."""
