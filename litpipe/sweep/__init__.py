"""`litpipe sweep`: text-side experiments over caches encoded once, run side by side on Ray Tune."""
