"""Edge-cloud serving: the cloud runs the first steps of many users' trajectories, batched.

The split follows vLLM's: `engine` is the loop, `scheduler` decides who takes part in
the next U-Net call, `worker` owns the models and runs that call. `app` is the HTTP
face (validation, auth, metrics); `client` and `edge` are the device's side, which
asks the cloud for the first segment and finishes the image locally. `admission`
grants or denies users by the users axis' planner and sets their splits, with the
server's own live per-step profile (`profile`).
"""
