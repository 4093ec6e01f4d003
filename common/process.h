// Process life of the three daemons: signals taken synchronously, a readable report when the
// process crashes, and an exit that does not race threads the process does not own.
#pragma once

namespace nbdcsi {

// Call first thing in main(), before any thread exists: SIGINT, SIGTERM, SIGUSR1 and SIGUSR2
// are blocked in every thread and taken synchronously by WaitForTerminationSignal(); SIGPIPE is
// ignored.
void BlockTerminationSignals();
// Blocks until SIGINT or SIGTERM arrives; returns the signal number. On the way, SIGUSR1 makes
// the log one step more verbose and SIGUSR2 one step less (ProcessLogLevel().Step, which logs
// the new level), so every daemon's level can change at run time without an API. Signals that
// arrive before the daemon waits (during start-up) are held and taken then (several of one
// kind, as one).
int WaitForTerminationSignal();

// Turns off absl::Mutex deadlock detection, as release builds of Abseil have it: Debian's Abseil
// is built without NDEBUG, so every absl::Mutex (gRPC's, the etcd client's) otherwise keeps a
// process-wide lock-order graph, updated under a global lock on every nested acquisition. Call
// first thing in main(), before gRPC starts.
void UseReleaseMutexes();

// On SIGSEGV, SIGBUS, SIGILL, SIGFPE or SIGABRT: writes the signal, the faulting address and a
// backtrace to stderr (the daemon's log in a pod or a test), then dies of the same signal, so
// the exit status and a core dump are what they would have been. No-op in sanitizer builds,
// whose own reports are better.
void InstallCrashReporter();

// Ends the process once main has stopped and released everything it owns: flushes the logs,
// runs the leak check of an ASan build, then _exit(code). Static destructors do not run: gRPC's
// certificate-file watcher and this project's TLS poller are threads that live to the end of the
// process, and a global torn down under them is a crash on the way out (exit 139 after a clean
// shutdown).
[[noreturn]] void ExitProcess(int code);

// The whole main() of a daemon: the three calls above that must come before any thread exists
// (every thread inherits the signal mask, so SIGTERM during start-up waits for the daemon to be up
// and then stops it cleanly), then `run`, then out through ExitProcess with its exit status.
[[noreturn]] void DaemonMain(int argc, char** argv, int (*run)(int argc, char** argv));

}  // namespace nbdcsi
