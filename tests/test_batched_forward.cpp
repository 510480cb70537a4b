// Filled in by the tests for the paged cache's sharing and the batched forward.
