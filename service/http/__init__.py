"""The HTTP surface: app factory, routes per surface, middleware, auth, and the one error -> HTTP mapping."""
