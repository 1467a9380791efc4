"""diffsample.cli."""
