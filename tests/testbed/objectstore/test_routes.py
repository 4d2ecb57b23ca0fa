"""The routing table: each (scope, method, sub-resource) reaches its operation; anything else gets the S3
error the server always answered (405 on the service, 501 on a bucket or an object)."""

from __future__ import annotations

import pytest

from testbed.objectstore.routes import BUCKET, OBJECT, SERVICE, resolve, scope_of
from testbed.wire.errors import S3Error


def route_name(scope: str, method: str, *params: str, headers: dict | None = None) -> str:
    return resolve(scope, method, dict.fromkeys(params, ""), headers or {}).name


@pytest.mark.parametrize(
    ("scope", "method", "params", "name"),
    [
        (SERVICE, "GET", (), "ListBuckets"),
        (SERVICE, "GET", ("objectcache-pacer",), "ListBuckets"),
        (SERVICE, "POST", ("objectcache-pacer",), "SetPacer"),
        (BUCKET, "POST", ("gather",), "Gather"),
        (BUCKET, "POST", ("delete", "gather"), "Gather"),  # gather takes precedence
        (BUCKET, "POST", ("delete",), "DeleteObjects"),
        (BUCKET, "PUT", (), "CreateBucket"),
        (BUCKET, "HEAD", ("anything",), "HeadBucket"),
        (BUCKET, "DELETE", (), "DeleteBucket"),
        (BUCKET, "GET", ("location",), "GetBucketLocation"),
        (BUCKET, "GET", ("gather", "location"), "GetBucketLocation"),
        (BUCKET, "GET", (), "ListObjects"),
        (BUCKET, "GET", ("versioning",), "GetBucketVersioning"),
        (BUCKET, "GET", ("versions", "prefix", "key-marker"), "ListObjectVersions"),
        (BUCKET, "GET", ("uploads", "prefix", "max-uploads"), "ListMultipartUploads"),
        (OBJECT, "GET", ("uploadId", "max-parts"), "ListParts"),
        (
            BUCKET,
            "GET",
            ("list-type", "prefix", "delimiter", "max-keys", "continuation-token"),
            "ListObjects",
        ),
        (OBJECT, "PUT", ("uploadId", "partNumber"), "UploadPart"),
        (OBJECT, "PUT", (), "PutObject"),
        (OBJECT, "GET", (), "GetObject"),
        (OBJECT, "GET", ("versionId",), "GetObject"),
        (OBJECT, "GET", ("uploads",), "GetObject"),
        (OBJECT, "HEAD", (), "HeadObject"),
        (OBJECT, "DELETE", ("uploadId",), "AbortMultipartUpload"),
        (OBJECT, "DELETE", (), "DeleteObject"),
        (OBJECT, "POST", ("uploads",), "CreateMultipartUpload"),
        (OBJECT, "POST", ("uploads", "uploadId"), "CreateMultipartUpload"),
        (OBJECT, "POST", ("quarantine",), "Quarantine"),
        (OBJECT, "POST", ("uploadId",), "CompleteMultipartUpload"),
    ],
)
def test_routes(scope, method, params, name):
    assert route_name(scope, method, *params) == name


def test_copy_source_header_is_a_put_sub_resource():
    copy = {"x-amz-copy-source": "/b/k"}
    assert route_name(OBJECT, "PUT", headers=copy) == "CopyObject"
    assert route_name(OBJECT, "PUT", "uploadId", headers=copy) == "CopyObject"
    assert route_name(OBJECT, "PUT", "uploadId", "partNumber", headers=copy) == "UploadPart"
    assert route_name(OBJECT, "GET", headers=copy) == "GetObject"
    assert route_name(OBJECT, "DELETE", headers=copy) == "DeleteObject"


@pytest.mark.parametrize(
    ("scope", "method", "params", "code", "status"),
    [
        (SERVICE, "PUT", (), "MethodNotAllowed", 405),
        (SERVICE, "POST", (), "MethodNotAllowed", 405),
        (BUCKET, "PUT", ("acl",), "NotImplemented", 501),
        (BUCKET, "DELETE", ("cors",), "NotImplemented", 501),
        (BUCKET, "GET", ("policy",), "NotImplemented", 501),
        (BUCKET, "GET", ("lifecycle",), "NotImplemented", 501),
        (BUCKET, "PUT", ("versioning",), "NotImplemented", 501),
        (BUCKET, "GET", ("versioning", "prefix"), "NotImplemented", 501),
        (BUCKET, "POST", (), "NotImplemented", 501),
        (OBJECT, "PUT", ("uploadId",), "NotImplemented", 501),
        (OBJECT, "PUT", ("tagging",), "NotImplemented", 501),
        (OBJECT, "GET", ("acl",), "NotImplemented", 501),
        (OBJECT, "HEAD", ("partNumber",), "NotImplemented", 501),
        (OBJECT, "DELETE", ("tagging",), "NotImplemented", 501),
        (OBJECT, "POST", (), "NotImplemented", 501),
        (OBJECT, "PATCH", (), "NotImplemented", 501),
    ],
)
def test_unknown_requests_get_the_scopes_error(scope, method, params, code, status):
    with pytest.raises(S3Error) as err:
        route_name(scope, method, *params)
    assert (err.value.s3_code, err.value.http_status) == (code, status)


def test_scope_of():
    assert (scope_of("", ""), scope_of("b", ""), scope_of("b", "k")) == (SERVICE, BUCKET, OBJECT)
