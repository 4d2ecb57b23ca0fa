"""S3 XML documents: error bodies and the listing / multipart responses the server produces.

Small string builders (escaping every value) rather than an XML library: the documents are flat, and the
output must match what botocore's parsers expect (namespace ``http://s3.amazonaws.com/doc/2006-03-01/``).
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from email.utils import formatdate
from xml.sax.saxutils import escape

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
XML_DECL = '<?xml version="1.0" encoding="UTF-8"?>\n'


def iso8601(t_s: float) -> str:
    """S3's timestamp format in XML bodies: 2026-01-01T00:00:00.000Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_s)) + f".{int((t_s % 1) * 1000):03d}Z"


def http_date(t_s: float) -> str:
    return formatdate(t_s, usegmt=True)


def el(name: str, value) -> str:
    return f"<{name}>{escape(str(value))}</{name}>"


def error_xml(code: str, message: str, resource: str = "", request_id: str = "", **extra: str) -> bytes:
    parts = [el("Code", code), el("Message", message)]
    for k, v in extra.items():
        if v:
            parts.append(el(k, v))
    if resource:
        parts.append(el("Resource", resource))
    if request_id:
        parts.append(el("RequestId", request_id))
    return (XML_DECL + "<Error>" + "".join(parts) + "</Error>").encode()


def doc(root: str, body: str) -> bytes:
    return (XML_DECL + f'<{root} xmlns="{S3_NS}">' + body + f"</{root}>").encode()


def owner() -> str:
    return "<Owner><ID>objectcache</ID><DisplayName>objectcache</DisplayName></Owner>"


def initiator() -> str:
    return "<Initiator><ID>objectcache</ID><DisplayName>objectcache</DisplayName></Initiator>"


def parse_complete_multipart(body: bytes) -> list[tuple[int, str]]:
    """(part number, etag) pairs of a CompleteMultipartUpload body; raises ValueError if malformed."""
    root = ET.fromstring(body)
    out = []
    for part in root.iter():
        if part.tag.rsplit("}", 1)[-1] != "Part":
            continue
        fields = {c.tag.rsplit("}", 1)[-1]: (c.text or "") for c in part}
        out.append((int(fields["PartNumber"]), fields.get("ETag", "").strip().strip('"')))
    return out


def parse_delete_objects(body: bytes) -> tuple[list[str], bool]:
    """Keys of a DeleteObjects (multi-object delete) body and its Quiet flag."""
    root = ET.fromstring(body)
    keys, quiet = [], False
    for node in root:
        tag = node.tag.rsplit("}", 1)[-1]
        if tag == "Quiet":
            quiet = (node.text or "").strip().lower() == "true"
        elif tag == "Object":
            for c in node:
                if c.tag.rsplit("}", 1)[-1] == "Key":
                    keys.append(c.text or "")
    return keys, quiet
