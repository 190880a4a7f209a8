"""Engine replicas on a Ray cluster with Ray Serve, behind qwen-api's own front (`qwen-api serve --ray`).

`front` serves the API and watches the replicas, `deploy` joins the cluster and deploys them, `replica` holds
one engine per replica, `client` is the engine contract over Ray Serve's handle, `router` and `prefix` send
each request to the replica holding its prompt's prefix. The engine package knows nothing of this one.
"""
