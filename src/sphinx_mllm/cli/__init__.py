"""L8: the thin command line. Each area registers its subcommands in its own module."""
