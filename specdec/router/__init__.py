"""The router tier: routes from a YAML file, the small model first, escalation to the local pair or
to remote endpoints. The routes file and its checks (`routes`), the confidence summaries
(`confidence`) and calibrations (`calibration`) its rules read, answer checks against JSON Schemas
(`validators`), remote endpoints (`endpoints`), and routing one request in-process with draft reuse
(`router`); the server's routed requests arrive with the rest of the router issue."""
