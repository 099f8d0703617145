#include "tests/support/subprocess.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>

extern char** environ;

namespace custos::testing {
namespace {

std::string ReadAndRemove(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  std::remove(path.c_str());
  return s.str();
}

}  // namespace

std::ostream& operator<<(std::ostream& os, const ProcessResult& r) {
  return os << "exit " << r.code << "\n--- stdout:\n"
            << r.out.substr(0, 2000) << "\n--- stderr:\n"
            << r.err;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> EnvironmentWithout(const std::string& prefix) {
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::string(*e).rfind(prefix, 0) != 0) env.push_back(*e);
  }
  return env;
}

ProcessResult RunProcess(const std::vector<std::string>& argv_in,
                         const std::vector<std::string>& env_in,
                         const std::string& stdin_path,
                         const std::string& scratch_prefix) {
  std::vector<std::string> argv_s = argv_in, env_s = env_in;
  std::vector<char*> argv, envp;
  for (std::string& s : argv_s) argv.push_back(s.data());
  argv.push_back(nullptr);
  for (std::string& s : env_s) envp.push_back(s.data());
  envp.push_back(nullptr);
  const std::string out_path = scratch_prefix + ".out";
  const std::string err_path = scratch_prefix + ".err";
  int in = open(stdin_path.c_str(), O_RDONLY | O_CLOEXEC);
  int out =
      open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  int err =
      open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ProcessResult r;
  if (in < 0 || out < 0 || err < 0) {
    r.err = "test harness: cannot open " + stdin_path + " or " + out_path;
    if (in >= 0) close(in);
    if (out >= 0) close(out);
    if (err >= 0) close(err);
    return r;
  }
  pid_t pid = fork();
  if (pid == 0) {
    dup2(in, STDIN_FILENO);
    dup2(out, STDOUT_FILENO);
    dup2(err, STDERR_FILENO);
    execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  close(in);
  close(out);
  close(err);
  int status = 0;
  waitpid(pid, &status, 0);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = ReadAndRemove(out_path);
  r.err = ReadAndRemove(err_path);
  return r;
}

}  // namespace custos::testing
