"""dnr-deploy: robust pruning by Dynamic Network Rewiring, and verified deployment of the result."""

__version__ = "0.1.0"

__all__ = ["__version__", "compress"]


def __getattr__(name: str):
    # Lazy so `import dnr_deploy` stays cheap for the CLI's argument errors.
    if name == "compress":
        from dnr_deploy.compress import compress

        return compress
    raise AttributeError(name)
