"""Run the locked image tower once over every image into the store (a Ray Data job)."""
