"""The object-tier client: put chunks, check existence, load a cached prefix layer by layer (gather against
ObjectCache's server; ranged or whole-object GETs against plain S3)."""

from testbed.client.core import ObjectCacheClient, make_boto3_client

__all__ = ["ObjectCacheClient", "make_boto3_client"]
