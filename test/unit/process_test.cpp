#include "common/process.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <functional>
#include <string>
#include <thread>

#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

namespace nbdcsi {
namespace {

struct Child {
  int status = 0;
  std::string stderr_text;
};

// Runs `body` in a forked child with stderr captured; returns how the child ended.
Child RunInChild(const std::function<void()>& body) {
  int fds[2];
  EXPECT_EQ(pipe(fds), 0);
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    dup2(fds[1], STDERR_FILENO);
    body();
    _exit(200);  // body must not return
  }
  close(fds[1]);
  Child c;
  char buf[4096];
  for (ssize_t n; (n = read(fds[0], buf, sizeof(buf))) > 0;) c.stderr_text.append(buf, n);
  close(fds[0]);
  EXPECT_EQ(waitpid(pid, &c.status, 0), pid);
  return c;
}

bool Sanitized() {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  return true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
  return true;
#else
  return false;
#endif
#else
  return false;
#endif
}

TEST(Process, TerminationSignalIsTakenSynchronously) {
  Child c = RunInChild([] {
    BlockTerminationSignals();
    // A thread started afterwards inherits the mask: the signal can only end up in sigwait.
    std::thread t([] { kill(getpid(), SIGTERM); });
    t.join();
    const int sig = WaitForTerminationSignal();
    // SIGPIPE is ignored: writing to a closed pipe is EPIPE, not death.
    int p[2];
    if (pipe(p) != 0) _exit(100);
    close(p[0]);
    if (write(p[1], "x", 1) != -1 || errno != EPIPE) _exit(101);
    _exit(sig);
  });
  ASSERT_TRUE(WIFEXITED(c.status)) << "killed by signal " << WTERMSIG(c.status);
  EXPECT_EQ(WEXITSTATUS(c.status), SIGTERM);
}

TEST(Process, UserSignalsStepTheLogLevelAndDoNotEndTheWait) {
  Child c = RunInChild([] {
    dup2(STDERR_FILENO, STDOUT_FILENO);  // spdlog's default logger writes to stdout
    spdlog::set_level(spdlog::level::info);
    BlockTerminationSignals();
    // Each signal is taken before the next is sent (pending ones of a kind would merge): the
    // level the wait applies is what the thread waits for.
    std::thread t([] {
      auto send = [](int sig, spdlog::level::level_enum want) {
        kill(getpid(), sig);
        // The poll of a bounded wait.
        for (int i = 0; i < 5000 && spdlog::get_level() != want; ++i) usleep(1000);
        if (spdlog::get_level() != want) _exit(110 + sig);
      };
      send(SIGUSR1, spdlog::level::debug);
      send(SIGUSR1, spdlog::level::trace);
      send(SIGUSR2, spdlog::level::debug);
      kill(getpid(), SIGTERM);
    });
    const int sig = WaitForTerminationSignal();
    t.join();
    _exit(sig == SIGTERM && spdlog::get_level() == spdlog::level::debug ? 0 : 100);
  });
  ASSERT_TRUE(WIFEXITED(c.status)) << "killed by signal " << WTERMSIG(c.status);
  EXPECT_EQ(WEXITSTATUS(c.status), 0) << c.stderr_text;
  EXPECT_NE(c.stderr_text.find("log level info -> debug (SIGUSR1)"), std::string::npos)
      << c.stderr_text;
  EXPECT_NE(c.stderr_text.find("log level trace -> debug (SIGUSR2)"), std::string::npos)
      << c.stderr_text;
}

TEST(Process, CrashIsReportedWithABacktraceAndEndsWithTheSameSignal) {
  if (Sanitized()) GTEST_SKIP() << "the sanitizer's own handler reports crashes in this build";
  Child c = RunInChild([] {
    InstallCrashReporter();
    std::thread t([] {
      volatile int* p = nullptr;
      *p = 1;  // NOLINT: the crash under test
    });
    t.join();
  });
  ASSERT_TRUE(WIFSIGNALED(c.status)) << "exit status " << c.status << "\n" << c.stderr_text;
  EXPECT_EQ(WTERMSIG(c.status), SIGSEGV);
  EXPECT_NE(c.stderr_text.find("FATAL: signal 11 (SEGV)"), std::string::npos) << c.stderr_text;
  EXPECT_NE(c.stderr_text.find("address 0x0"), std::string::npos) << c.stderr_text;
  EXPECT_NE(c.stderr_text.find("backtrace:\n"), std::string::npos) << c.stderr_text;
  // At least a few frames, one per line, after the header.
  const size_t frames = std::count(c.stderr_text.begin(), c.stderr_text.end(), '\n');
  EXPECT_GE(frames, 4u) << c.stderr_text;
}

TEST(Process, AbortIsReportedToo) {
  if (Sanitized()) GTEST_SKIP() << "the sanitizer's own handler reports crashes in this build";
  Child c = RunInChild([] {
    InstallCrashReporter();
    abort();
  });
  ASSERT_TRUE(WIFSIGNALED(c.status)) << c.stderr_text;
  EXPECT_EQ(WTERMSIG(c.status), SIGABRT);
  EXPECT_NE(c.stderr_text.find("FATAL: signal 6 (ABRT)"), std::string::npos) << c.stderr_text;
}

// What ExitProcess is for: a thread of a library that outlives main must not turn a clean
// shutdown into a crash. Here the thread keeps using a global whose destructor would run in
// exit(); with ExitProcess the destructor never runs and the exit status is the one given.
struct Tripwire {
  bool armed = false;  // only in the children; the test binary itself exits normally
  std::atomic<bool> alive{true};
  ~Tripwire() {
    alive = false;
    // What a torn-down global looks like to a thread still using it.
    if (armed) _exit(99);
  }
};
Tripwire g_tripwire;

TEST(Process, ExitSkipsStaticDestructorsAndKeepsTheCode) {
  Child c = RunInChild([] {
    g_tripwire.armed = true;
    std::thread([] {
      for (;;) {
        if (!g_tripwire.alive) _exit(98);
        usleep(1000);  // a watcher until the process ends: nothing signals "torn down"
      }
    }).detach();
    ExitProcess(7);
  });
  ASSERT_TRUE(WIFEXITED(c.status)) << c.stderr_text;
  EXPECT_EQ(WEXITSTATUS(c.status), 7);
}

TEST(Process, PlainExitWouldRunTheDestructorTheTestReliesOn) {
  // The control for the test above: exit() does run the global's destructor.
  Child c = RunInChild([] {
    g_tripwire.armed = true;
    exit(7);
  });
  ASSERT_TRUE(WIFEXITED(c.status));
  EXPECT_EQ(WEXITSTATUS(c.status), 99);
}

}  // namespace
}  // namespace nbdcsi
