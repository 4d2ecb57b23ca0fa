"""vLLM integration of ObjectCache: ``ObjectCacheConnector``, a v1 KV connector that loads prefix KV layer by
layer from ObjectCache's S3 server (or any S3 service) and writes new full chunks back.

``kv_connector_module_path`` points at this package; vLLM then finds ``ObjectCacheConnector`` here.
"""

from testbed.engine.vllm.connector import ObjectCacheConnector

__all__ = ["ObjectCacheConnector"]
