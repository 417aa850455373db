"""Analysis on captures and models: metrics, LEACE, probes for social neurons, logit lens, locate, attribution."""
