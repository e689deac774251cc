wrk.method = "POST"
wrk.body = string.rep("x", 20000)
wrk.headers["x-api-key"] = "bench-key-1"
