"""The subcommands of ``flyt``: each module's ``add_arguments`` and ``run``."""
