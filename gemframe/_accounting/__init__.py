"""What a job costs and what produced it: prices, estimates, manifests, reports."""
