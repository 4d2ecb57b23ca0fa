"""What crosses the wire between the engine and the object tier: the KV chunk object format, gather frames,
the error classes both sides raise, and the S3 XML bodies.  Imports nothing of the testbed above it."""
