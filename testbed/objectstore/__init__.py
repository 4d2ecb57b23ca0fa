"""The S3 server with layer-major gather: request routing and operations, the policy-driven pacer, stores
(filesystem, S3 proxy in front of any S3 service), SigV4 verification, metrics and the process launcher.
``python -m testbed.objectstore`` starts a server."""
