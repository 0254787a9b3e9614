"""The router tier: routes from a YAML file, the small model first, escalation to the local pair or
to remote endpoints. So far: the remote endpoints (`endpoints`); the routes themselves arrive with
the router issue."""
