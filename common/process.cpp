#include "common/process.h"

#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include <cstdio>
#include <iterator>

#include <absl/synchronization/mutex.h>
#include <spdlog/spdlog.h>

#include "common/log_level.h"

// GCC says __SANITIZE_*__, clang __has_feature.
#if defined(__SANITIZE_ADDRESS__)
#define NBDCSI_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define NBDCSI_ASAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define NBDCSI_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define NBDCSI_TSAN 1
#endif
#endif
#ifdef NBDCSI_ASAN
#include <sanitizer/lsan_interface.h>
#endif

namespace nbdcsi {
namespace {

// Also the log level's signals: blocked like the others (their default action would end the
// process) and taken by the same wait.
sigset_t TerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGUSR1);
  sigaddset(&set, SIGUSR2);
  return set;
}

constexpr int kFatalSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};

// Only async-signal-safe calls from here on: write(2), backtrace_symbols_fd, sigaction, raise.
void WriteAll(const char* s, size_t n) {
  while (n > 0) {
    ssize_t w = write(STDERR_FILENO, s, n);
    if (w <= 0) return;
    s += w;
    n -= static_cast<size_t>(w);
  }
}

void WriteStr(const char* s) { WriteAll(s, strlen(s)); }

void WriteNumber(unsigned long long v, unsigned base) {
  char buf[24];
  size_t i = sizeof(buf);
  do {
    buf[--i] = "0123456789abcdef"[v % base];
    v /= base;
  } while (v > 0 && i > 0);
  WriteAll(buf + i, sizeof(buf) - i);
}

void OnFatalSignal(int sig, siginfo_t* info, void*) {
  WriteStr("FATAL: signal ");
  WriteNumber(static_cast<unsigned>(sig), 10);
  WriteStr(" (");
  WriteStr(sigabbrev_np(sig) ? sigabbrev_np(sig) : "?");
  WriteStr(") in thread ");
  WriteNumber(static_cast<unsigned long long>(gettid()), 10);
  if (sig != SIGABRT && info != nullptr) {
    WriteStr(", address 0x");
    WriteNumber(reinterpret_cast<unsigned long long>(info->si_addr), 16);
  }
  WriteStr("; backtrace:\n");
  void* frames[64];
  int n = backtrace(frames, static_cast<int>(std::size(frames)));
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  // SA_RESETHAND restored the default action: the same signal now ends the process as usual.
  raise(sig);
}

}  // namespace

void BlockTerminationSignals() {
  sigset_t set = TerminationSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  // A client that hangs up mid-reply must not kill the process.
  signal(SIGPIPE, SIG_IGN);
}

int WaitForTerminationSignal() {
  sigset_t set = TerminationSignals();
  for (;;) {
    int sig = 0;
    if (sigwait(&set, &sig) != 0) continue;
    if (sig == SIGUSR1 || sig == SIGUSR2) {
      ProcessLogLevel().Step(sig == SIGUSR1, sig == SIGUSR1 ? "SIGUSR1" : "SIGUSR2");
      continue;
    }
    return sig;
  }
}

void InstallCrashReporter() {
#if !defined(NBDCSI_ASAN) && !defined(NBDCSI_TSAN)
  // backtrace() loads libgcc on first use, which allocates: do it now, not in the handler.
  void* warm[1];
  backtrace(warm, 1);
  // The main thread's own stack: its overflow is a SIGSEGV with no stack left to report it on.
  static char alt_stack[64 * 1024];
  stack_t ss{};
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof(alt_stack);
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_sigaction = OnFatalSignal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESETHAND;
  sigemptyset(&sa.sa_mask);
  for (int sig : kFatalSignals) sigaction(sig, &sa, nullptr);
#endif
}

void ExitProcess(int code) {
  spdlog::shutdown();
  std::fflush(nullptr);
#ifdef NBDCSI_ASAN
  // _exit skips the atexit hook that runs LeakSanitizer: run it here, with the same verdict.
  __lsan_do_leak_check();
#endif
  _exit(code);
}

void DaemonMain(int argc, char** argv, int (*run)(int argc, char** argv)) {
  BlockTerminationSignals();
  UseReleaseMutexes();
  InstallCrashReporter();
  ExitProcess(run(argc, argv));
}

void UseReleaseMutexes() { absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore); }

}  // namespace nbdcsi
