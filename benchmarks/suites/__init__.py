"""One module per suite, each with ``run(ctx)``; discovered by file name."""
