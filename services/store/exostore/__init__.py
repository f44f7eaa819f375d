"""The entity store: chain tailer, indices, aggregation, query engine and watched queries."""
