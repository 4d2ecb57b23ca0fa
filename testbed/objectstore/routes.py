"""The routing table: which operation answers a request, by scope, method and sub-resource.

A request's *scope* is what its path names: the service (``/``), a bucket (``/<bucket>``) or an object
(``/<bucket>/<key>``).  Its *sub-resource* is the first query parameter, in the scope's precedence order
(``SUBRESOURCES``), that selects an operation for its method (``?uploads``, ``?gather``, ...); a PUT's
``x-amz-copy-source`` header counts as one too (CopyObject).  ``ROUTES[scope][(method, subresource)]``
is the ``Route``; the sub-resource ``""`` is the plain operation, taken when no sub-resource matched.

A route may further restrict the query: ``requires`` (parameters that must be present, e.g. UploadPart's
``partNumber``), ``allowed`` (the only other parameters accepted; ``None``: any) and ``refused`` (parameters
that rule it out).  A request no route takes gets its scope's S3 error (``resolve``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from testbed.objectstore import kvops, multipart, objectops
from testbed.objectstore.context import RequestContext
from testbed.wire.errors import S3Error

Operation = Callable[[RequestContext], Awaitable[web.StreamResponse]]

SERVICE, BUCKET, OBJECT = "service", "bucket", "object"
COPY_SOURCE = "x-amz-copy-source"  # a header, routed like a sub-resource of PUT

# ListObjects (v1 and v2) parameters: a bucket GET with anything else is not implemented.
LIST_PARAMS = frozenset(
    {
        "list-type",
        "prefix",
        "delimiter",
        "max-keys",
        "continuation-token",
        "start-after",
        "encoding-type",
        "fetch-owner",
        "marker",
    }
)
NONE: frozenset[str] = frozenset()
VERSIONS_PARAMS = frozenset(
    {"prefix", "delimiter", "key-marker", "version-id-marker", "max-keys", "encoding-type"}
)
UPLOADS_PARAMS = frozenset(
    {"prefix", "delimiter", "key-marker", "upload-id-marker", "max-uploads", "encoding-type"}
)
LIST_PARTS_PARAMS = frozenset({"max-parts", "part-number-marker", "encoding-type"})


@dataclass(frozen=True)
class Route:
    """One operation: ``name`` is its S3 name (the ``op`` label of the metrics)."""

    name: str
    operation: Operation
    requires: frozenset[str] = NONE
    allowed: frozenset[str] | None = None
    refused: frozenset[str] = NONE

    def accepts(self, params: set[str]) -> bool:
        """Whether the query parameters left besides the sub-resource fit this route."""
        if not self.requires <= params:
            return False
        rest = params - self.requires
        if self.allowed is not None and not rest <= self.allowed:
            return False
        return not (rest & self.refused)


# Sub-resources in precedence order: the first one present with a route for the method wins.
SUBRESOURCES = {
    SERVICE: ("objectcache-pacer",),
    BUCKET: ("gather", "delete", "location", "versioning", "versions", "uploads"),
    OBJECT: ("uploads", "quarantine", "uploadId", COPY_SOURCE),
}

_NOT_FOR_GET = frozenset({"uploadId", "partNumber", "acl", "tagging"})

ROUTES: dict[str, dict[tuple[str, str], Route]] = {
    SERVICE: {
        ("GET", ""): Route("ListBuckets", objectops.list_buckets),
        ("POST", "objectcache-pacer"): Route("SetPacer", kvops.pacer_control),
    },
    BUCKET: {
        ("POST", "gather"): Route("Gather", kvops.gather),
        ("POST", "delete"): Route("DeleteObjects", objectops.delete_objects),
        ("PUT", ""): Route("CreateBucket", objectops.create_bucket, allowed=NONE),
        ("HEAD", ""): Route("HeadBucket", objectops.head_bucket),
        ("DELETE", ""): Route("DeleteBucket", objectops.delete_bucket, allowed=NONE),
        ("GET", "location"): Route("GetBucketLocation", objectops.bucket_location),
        ("GET", "versioning"): Route("GetBucketVersioning", objectops.bucket_versioning, allowed=NONE),
        ("GET", "versions"): Route(
            "ListObjectVersions", objectops.list_object_versions, allowed=VERSIONS_PARAMS
        ),
        ("GET", "uploads"): Route(
            "ListMultipartUploads", multipart.list_multipart_uploads, allowed=UPLOADS_PARAMS
        ),
        ("GET", ""): Route("ListObjects", objectops.list_objects, allowed=LIST_PARAMS),
    },
    OBJECT: {
        ("PUT", "uploadId"): Route("UploadPart", multipart.upload_part, requires=frozenset({"partNumber"})),
        ("PUT", COPY_SOURCE): Route("CopyObject", objectops.copy_object),
        ("PUT", ""): Route("PutObject", objectops.put_object, allowed=NONE),
        ("GET", "uploadId"): Route("ListParts", multipart.list_parts, allowed=LIST_PARTS_PARAMS),
        ("GET", ""): Route("GetObject", objectops.get_object, refused=_NOT_FOR_GET),
        ("HEAD", ""): Route("HeadObject", objectops.get_object, refused=_NOT_FOR_GET),
        ("DELETE", "uploadId"): Route("AbortMultipartUpload", multipart.abort_multipart),
        ("DELETE", ""): Route("DeleteObject", objectops.delete_object, allowed=NONE),
        ("POST", "uploads"): Route("CreateMultipartUpload", multipart.create_multipart),
        ("POST", "quarantine"): Route("Quarantine", kvops.quarantine_report),
        ("POST", "uploadId"): Route("CompleteMultipartUpload", multipart.complete_multipart),
    },
}


def scope_of(bucket: str, key: str) -> str:
    return OBJECT if key else BUCKET if bucket else SERVICE


def resolve(scope: str, method: str, query: Mapping[str, str], headers: Mapping[str, str]) -> Route:
    """The route for a request, or its scope's S3 error: ``405 MethodNotAllowed`` on the service,
    ``501 NotImplemented`` on a bucket or an object."""
    routes = ROUTES[scope]
    params = set(query)
    present = params | ({COPY_SOURCE} if COPY_SOURCE in headers else set())
    for sub in SUBRESOURCES[scope]:
        route = routes.get((method, sub))
        if sub in present and route is not None and route.accepts(params - {sub}):
            return route
    route = routes.get((method, ""))
    if route is not None and route.accepts(params):
        return route
    if scope == SERVICE:
        raise S3Error("MethodNotAllowed", f"{method} / is not supported", 405)
    what = "a bucket" if scope == BUCKET else "an object"
    raise S3Error("NotImplemented", f"{method} on {what} with {sorted(query)} is not implemented", 501)
