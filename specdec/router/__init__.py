"""The router tier: routes from a YAML file, the small model first, escalation to the local pair or
to remote endpoints. So far: the routes file and its checks (`routes`), the confidence summaries
(`confidence`) and calibrations (`calibration`) its rules read, and the remote endpoints
(`endpoints`); serving routed requests arrives with the rest of the router issue."""
