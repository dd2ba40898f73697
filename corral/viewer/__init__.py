"""Session viewers: a rich timeline for the terminal, a small read-only web page for `corral up`."""
