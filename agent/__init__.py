"""edge-agent: Triton-compatible edge inference with verified fleet updates."""

__version__ = "0.1.0"
