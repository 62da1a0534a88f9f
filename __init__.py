"""jaxlm: a functional transformer framework for JAX."""
