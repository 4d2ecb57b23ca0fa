"""ObjectCache's shared decision core.

Pure and deterministic: plain dataclasses in, decisions out.  It imports only the standard library, numpy and
scipy -- never simpy, torch, boto3, hydra -- and never reads the clock: the simulator passes simulated time,
the testbed real time.
"""

from scheduler.flows import FlowView, Link
from scheduler.geometry import DEFAULT_CHUNK_TOKENS, PRESETS, ModelSpec, get_model
from scheduler.keys import KeyScope, chunk_keys, longest_prefix, object_key
from scheduler.policies import get_policy, policy_names

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "PRESETS",
    "FlowView",
    "KeyScope",
    "Link",
    "ModelSpec",
    "chunk_keys",
    "get_model",
    "get_policy",
    "longest_prefix",
    "object_key",
    "policy_names",
]
