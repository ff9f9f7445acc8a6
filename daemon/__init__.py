"""The tlsbridge daemon: does all TLS, and joins each connection to Kamailio by a hairpin."""
