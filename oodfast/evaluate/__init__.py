"""``oodfast evaluate``: detection quality against mask ground truth, and representation probes."""
