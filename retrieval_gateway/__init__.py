"""retrieval_gateway: the client-facing Retrieve API over a device-resident corpus matrix."""
