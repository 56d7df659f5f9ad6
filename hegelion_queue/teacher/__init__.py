"""The teacher: the model that writes each dialectic, run as a command-line agent, never through a shell.

`process` starts every teacher process (own process group, PR_SET_PDEATHSIG) and defines the errors and the answer;
`jsonrpc` is the long-lived stdio process both protocols build on; `acp` the Agent Client Protocol pool (Kimi Code,
any ACP agent); `wire` kimi-cli 1.x's pool; `kimi` how a kimi process is set up (version, private home, the user's
login); `install` is `make kimi`; `presets` the `Teacher` a worker asks. Imports core only.
"""
