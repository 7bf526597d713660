"""alignd's HTTP service: API, database, storage and queue client.

It never imports ``workers`` nor torch/transformers, so the API image stays small and starts fast.
"""
