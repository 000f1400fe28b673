"""The profile registry: typed profiles loaded from ``llm_profiles.yaml``."""

from orion_llamaccp.profiles.models import GpuConfig, LlamaCppConfig, Profile, expand_path
from orion_llamaccp.profiles.registry import OtherProfile, Registry, load_registry

__all__ = [
    "GpuConfig",
    "LlamaCppConfig",
    "OtherProfile",
    "Profile",
    "Registry",
    "expand_path",
    "load_registry",
]
