"""The cluster tier (xllm-service): instance registry, routing policies, and the gRPC
protocol between the master and its instances. See docs/cluster.md."""
