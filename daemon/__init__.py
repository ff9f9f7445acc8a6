"""The tlsbridge daemon: terminates and originates TLS, joins each connection to Kamailio by a hairpin."""
