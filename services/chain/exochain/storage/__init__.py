"""Chain storage: the committed chain, the durable pending store and the node's sync metadata."""
