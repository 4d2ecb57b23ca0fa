"""The connector's settings (``kv_connector_extra_config``) and what it derives from vLLM's config.

Extra-config keys (all optional but ``endpoint`` and ``bucket``)::

    endpoint            S3 endpoint URL (ObjectCache's server, or any S3 service such as Ceph RGW)
    bucket              bucket holding the chunk objects
    credentials         {"access_key": ..., "secret_key": ...}  (or top-level access_key / secret_key)
    region              SigV4 region (us-east-1)
    namespace           tenant namespace of the keys and object names (default "default")
    chunk_tokens        tokens per chunk object; a multiple of vLLM's block size (default 256)
    mode                client read path: auto | gather | ranged | whole (auto: gather, else ranged GETs)
    load / save         enable loading / writing back (both true)
    planner             "plan" (scheduler.planner decides how much to load) or "all" (load every hit)
    object_bandwidth_Bps, object_overhead_s   what the planner assumes of the object tier
    cpu_peak_flops, cpu_mem_Bps               the roofline compute model of this host (RooflineCompute)
    timeout_s           per socket operation of the client (default 10)
    model_name          overrides the model name in the fingerprint (default: vLLM's model path)

Tenancy: a request's ``cache_salt`` becomes the key scope's secret salt, so requests with different salts
never address (or can even probe) each other's chunks; ``salt_namespaces`` ({salt: namespace}) optionally
also maps a salt to its own namespace (object-name prefix), e.g. for credentials confined to a namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from scheduler.geometry import ModelSpec
from scheduler.keys import KeyScope

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class ConnectorConfig:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    namespace: str = "default"
    chunk_tokens: int = 256
    mode: str = "auto"
    load: bool = True
    save: bool = True
    planner: str = "plan"
    object_bandwidth_Bps: float = 1e9
    object_overhead_s: float = 2e-3
    # Roofline of the host (RooflineCompute, mfu 0.5): 1.4e12 matches bf16 prefills (AMX) of a 110M-parameter
    # Llama on 2 cores of this Xeon (4096 tokens in ~1.3 s); set it per machine.
    cpu_peak_flops: float = 1.4e12
    cpu_mem_Bps: float = 2e10
    timeout_s: float = 10.0
    model_name: str | None = None
    salt_namespaces: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> ConnectorConfig:
        extra = dict(extra or {})
        creds = extra.pop("credentials", None) or {}
        if "endpoint" not in extra or "bucket" not in extra:
            raise ValueError(
                "ObjectCacheConnector needs 'endpoint' and 'bucket' in kv_connector_extra_config"
            )
        kwargs = {k: v for k, v in extra.items() if k in cls.__dataclass_fields__}
        kwargs.setdefault("access_key", creds.get("access_key", ""))
        kwargs.setdefault("secret_key", creds.get("secret_key", ""))
        if kwargs.get("planner", "plan") not in ("plan", "all"):
            raise ValueError(f"planner must be 'plan' or 'all', got {kwargs['planner']!r}")
        return cls(**kwargs)

    def client_kwargs(self) -> dict[str, Any]:
        return dict(
            endpoint_url=self.endpoint,
            bucket=self.bucket,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            mode=self.mode,
            timeout_s=self.timeout_s,
            retries=1,
        )

    def scope(self, fingerprint: str, cache_salt: str | None) -> KeyScope:
        """Key scope of a request: the model, the tenant namespace, and the request's cache salt."""
        salt = (cache_salt or "").encode()
        namespace = self.salt_namespaces.get(cache_salt or "", self.namespace)
        return KeyScope(fingerprint, namespace, salt)


def torch_dtype_name(dtype: torch.dtype) -> str:
    """kvformat's dtype name (bf16 / fp16 / fp32) of a torch dtype."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"KV dtype {dtype} is not supported by the object format") from None


def model_spec_from_vllm(vllm_config, name: str | None = None) -> ModelSpec:
    """ModelSpec (geometry, fingerprint) of the served model, from vLLM's model config.

    The fingerprint scopes the chunk keys: it covers the model path (or ``name``) and the geometry, so two
    engines serving the same checkpoint share chunks and different models never do.
    """
    mc = vllm_config.model_config
    hf = mc.hf_text_config
    return ModelSpec(
        name=name or str(mc.model),
        num_layers=int(hf.num_hidden_layers),
        num_kv_heads=int(mc.get_total_num_kv_heads()),
        head_dim=int(mc.get_head_size()),
        dtype_bytes=torch.empty((), dtype=mc.dtype).element_size(),
        hidden_size=int(hf.hidden_size),
        num_heads=int(hf.num_attention_heads),
        intermediate_size=int(getattr(hf, "intermediate_size", 4 * hf.hidden_size)),
        vocab_size=int(hf.vocab_size),
        rope_theta=float(getattr(hf, "rope_theta", 10000.0) or 10000.0),
        rms_norm_eps=float(getattr(hf, "rms_norm_eps", 1e-5)),
    )


def object_names_for(vllm_config, token_ids, cache_salt: str | None = None) -> list[str]:
    """Object names of every full chunk of ``token_ids`` as the connector of this engine names them
    (tests and tools use it to check write-back or to tamper with stored chunks)."""
    from scheduler.keys import chunk_keys, object_key

    extra = vllm_config.kv_transfer_config.kv_connector_extra_config
    cfg = ConnectorConfig.from_extra(extra)
    model = model_spec_from_vllm(vllm_config, cfg.model_name)
    scope = cfg.scope(model.fingerprint(), cache_salt)
    return [object_key(scope, k) for k in chunk_keys(list(token_ids), scope, cfg.chunk_tokens)]
