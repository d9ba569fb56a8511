#include <sys/eventfd.h>
#include <sys/epoll.h>
#include <stdio.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>
static void *idle(void *a){ sleep(100); return 0; }
static double now(){ struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec*1e9+t.tv_nsec; }
int main(){
  pthread_t th; pthread_create(&th,0,idle,0); /* multi-threaded, as wasmbed */
  int e=eventfd(0,EFD_NONBLOCK|EFD_CLOEXEC); int ep=epoll_create1(0);
  struct epoll_event ev={.events=EPOLLIN|EPOLLET,.data.u64=0}; epoll_ctl(ep,EPOLL_CTL_ADD,e,&ev);
  uint64_t one=1; struct epoll_event out[8];
  for(int r=0;r<5;r++){
    int N=200000; double t0=now();
    for(int i=0;i<N;i++){ write(e,&one,8); }
    double t1=now();
    for(int i=0;i<N;i++){ epoll_wait(ep,out,8,0); }
    double t2=now();
    for(int i=0;i<N;i++){ write(e,&one,8); epoll_wait(ep,out,8,0);}
    double t3=now();
    struct timespec ts; double t4=now(); for(int i=0;i<N;i++) clock_gettime(CLOCK_MONOTONIC,&ts); double t5=now();
    printf("write %.0f ns, epoll_wait(0) %.0f ns, write+epoll_wait %.0f ns, clock_gettime %.0f ns\n",(t1-t0)/N,(t2-t1)/N,(t3-t2)/N,(t5-t4)/N);
  }
}
