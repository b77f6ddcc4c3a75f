"""Typed errors: every failure a user can cause maps to one of these and a clear message."""

from __future__ import annotations


class MLAFXError(Exception):
    """Base class; the CLI prints the message and exits non-zero."""


class LoadError(MLAFXError):
    """MODEL is not something mla-fx can load (missing, corrupt, unsupported, pickle refused)."""


class UnstreamableCheckpoint(LoadError):
    """A checkpoint whose keys transformers renames by patterns mla-fx does not follow: it loads only whole."""


class NoMLAError(MLAFXError):
    """The model has no Multi-head Latent Attention that the passes recognise."""


class PassError(MLAFXError):
    """A pass failed; the message names the pass and the ones that ran before it."""


class CheckFailed(MLAFXError):
    """A numerical-equivalence check exceeded its tolerance."""


class MissingDependency(MLAFXError):
    """An optional package (transformers, triton, tensorrt) is needed but not installed."""


def require(module: str, extra: str | None, purpose: str):
    """Import a dependency or raise MissingDependency naming the pip extra (None: a core dependency)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = f"pip install 'mla-fx[{extra}]'" if extra else "reinstall mla-fx, which depends on it"
        raise MissingDependency(f"{purpose} needs the '{module}' package: {hint}") from e
